"""Pieces shared by the reference agents: networks, environments, experts, buffers, progress."""
