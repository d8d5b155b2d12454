"""`loramux demo`: a tiny model, tokenizer and adapters built locally, and a tour of the server."""
