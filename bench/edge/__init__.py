"""The edge part of `bench.run`: loraplex against llama.cpp on the real SmolLM2-135M."""
