"""The one streaming layer loop: every method (GPTQ, AWQ, EXL2, RTN) and eval run through it."""
