"""The synthetic vessel data set from the command line.

    python -m fastunet.data write data/SYNTH          # converted layout; read as 'drive'
    python -m fastunet.data baseline                  # green-channel baseline, vessel Dice
"""
from .synthetic import main

if __name__ == "__main__":
    raise SystemExit(main())
