"""The dvsg-* console scripts: Ctrl-C and SIGTERM are taken over before the command's modules
are imported (`dvsprep.interrupts.ConsoleScript`), so that one during start-up is quiet too."""
from __future__ import annotations

from dvsprep.interrupts import ConsoleScript

dvsg_train = ConsoleScript("dvsg_train.cli", "train_main", "dvsg-train")
dvsg_eval = ConsoleScript("dvsg_train.cli", "eval_main", "dvsg-eval")
dvsg_export = ConsoleScript("dvsg_train.cli", "export_main", "dvsg-export")
dvsg_report = ConsoleScript("dvsg_train.cli", "report_main", "dvsg-report")
