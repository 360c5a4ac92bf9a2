"""The built-in source kinds, one module each (see `lossgraph.kinds.source.SourceKind`)."""
