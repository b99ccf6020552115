# Sourced by launch.sh and scripts/compare_objectives.sh (from the repo root): how training and calibration
# start. With a GPU, through Accelerate's single-GPU config; without one, plain Python.
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  TRAIN=(accelerate launch --config_file configs/accelerate/single_gpu.yaml align/train.py)
  CALIBRATE=(accelerate launch --config_file configs/accelerate/single_gpu.yaml -m align.calibrate)
else
  TRAIN=(python3 align/train.py); CALIBRATE=(python3 -m align.calibrate)
fi
