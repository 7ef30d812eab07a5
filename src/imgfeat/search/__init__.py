"""After extraction: nearest neighbours of a store's features (`index`, `exact`), queries
embedded as extraction does (`query`), near-duplicate groups (`dedup`) and what ties them
together for the command line and `Store.search` (`api`). faiss is imported only here, and
only when needed (the `search` extra)."""
