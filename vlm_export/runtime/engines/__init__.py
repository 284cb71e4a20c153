"""Engines: the interface every backend implements (``base``), engine choice for a device
(``select``) and opening one (``factory``); rooms for the backends themselves (``backends/``), a
ladder of token budgets (``ladder/``) and what is checked and measured about an engine
(``checks/``)."""
