"""The `dvsprep` console script: Ctrl-C and SIGTERM are taken over before the command's modules
are imported (`dvsprep.interrupts.ConsoleScript`), so that one during start-up is quiet too."""
from __future__ import annotations

from .interrupts import ConsoleScript

dvsprep = ConsoleScript("dvsprep.cli", "main", "dvsprep")
