"""The adapters stage: `package` (the package format every stage reads) and `export` (writes packages)."""
