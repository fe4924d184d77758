"""`python -m dvsg_train ...` runs dvsg-train (also under torchrun -m dvsg_train)."""
from .cli import train_main

if __name__ == "__main__":
    train_main(prog_name="dvsg-train")
