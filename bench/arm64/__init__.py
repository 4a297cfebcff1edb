"""loraplex on ARM64 under emulation: `run.sh` prepares it, `driver` serves and checks it."""
