"""Log reading for `/ops logs` and `/ops traffic`: one backend per component type, the same interface."""
