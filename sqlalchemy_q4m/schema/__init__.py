"""Queue tables: declaration and DDL, column types, the retry/priority mixins, subscription
conditions and Q4M's SQL functions. The bottom layer: it sends no statement of its own."""
