"""Quality evaluation: perplexity of reference, RTN and AWQ models, and the quality gate."""
