"""The SQLite store: schema, typed rows, compare-and-set, filters, concurrency."""
