"""Every kind of feedback: reward models, scorers, an LLM judge, rankings, and the labelling page."""
