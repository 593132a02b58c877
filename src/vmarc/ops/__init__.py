"""Format-agnostic operations over Archives: convert, extract, verify."""
