"""The coordinator service: runs rounds of the core coordinator over remote nodes."""
