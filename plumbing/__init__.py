"""What every command stands on: option types and the one user-error path, device and precision,
several processes, crash-safe writes, one run per folder and the stop request.
"""
