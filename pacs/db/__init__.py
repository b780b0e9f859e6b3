"""The SQL index: schema, engine and session handling."""
