"""What the tests and benches share: independent generators of every input format
(xvagen, vmagen, vhdgen), a model of XAPI's importer (xapimodel), the mutation fuzzer
(fuzz) and the helpers that run the command line (helpers). Imported as the package
tests.support: pytest puts the repository's root on the path for the tests package, and
benches and the fuzzer run as modules from the root (python -m ...)."""
