"""What the bench builds and serves: the random-init Llama and the real SmolLM2-135M, cached under bench/out/."""
