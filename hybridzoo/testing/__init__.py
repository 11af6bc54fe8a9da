"""Test helpers that ship with the package because the quickstart demo uses them: `local_hub.LocalHub`, a small
Hugging Face Hub-compatible server on 127.0.0.1. Nothing in the runtime packages imports this one."""
