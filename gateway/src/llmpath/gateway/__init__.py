"""llmpath reference gateway: the seven stages of the LLM API path as real, instrumented components."""
