"""Small, faithful reference implementations of the algorithms gradaudit is demonstrated on.

Each module trains on a CPU in seconds (`python -m reference_agents.NAME --help`) and carries its
documented buggy and fixed variants. Nothing here imports gradaudit: the agents are audited from
the outside, exactly like a user's training script.
"""
