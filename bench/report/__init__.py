"""`results.json` rendered: RESULTS.md (both parts) and the PNG plots."""
