"""What decides whether and where a request goes: the OpenAI-compatible router and its policies."""
