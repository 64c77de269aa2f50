"""Downstream use of feature files: probe (your classes, the paper's protocol) and search (FAISS)."""
