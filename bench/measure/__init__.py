"""What every part measures with: per-request results and statistics, the machine, the roofline."""
