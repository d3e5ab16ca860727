"""Reference architectures in plain torch (importable as `fmcompress.models`)."""
