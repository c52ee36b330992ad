"""FastAPI server speaking the OpenAI API on top of the quept runtime."""
