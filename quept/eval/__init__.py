"""Quality measurement: perplexity on fixed windows of a text file (`quept eval`)."""
