"""The front end: the user-facing side of the engine (LLM and the server), in the user's process."""
