"""The Llama-family model: layers, the NF4 and dense linears, weight loading, the KV cache."""
