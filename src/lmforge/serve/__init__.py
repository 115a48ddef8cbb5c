"""Serving: an OpenAI-compatible server over a continuous-batching engine, with its stores.

Nothing heavy is imported here, so `import lmforge.serve.cache` stays cheap for the CLI and the
data tools that read the feedback store.
"""
