"""Serving: a continuous-batching engine on the training model's code (engine.py), an OpenAI-compatible HTTP
server around it (server.py), and a load generator for any OpenAI-compatible server (bench.py).

Heavy modules (JAX, FastAPI, httpx) are imported by the commands that need them, not here.
"""
