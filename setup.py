from setuptools import find_packages, setup

setup(
    name="cakd",
    version="0.1.0",
    description="Cross-Architecture Knowledge Distillation (Liu et al., ACCV 2022), monkeypatch-free",
    packages=find_packages(include=["cakd", "cakd.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.5",
        "torchvision>=0.20",
        "numpy",
        "pyyaml",
        "tensorboard",
    ],
    # the tests draw the pictures and evaluate detections too, so the test extra holds the plots and detection extras
    extras_require={"test": ["pytest", "timm", "matplotlib", "pycocotools"], "plots": ["matplotlib"], "detection": ["pycocotools"]},
    entry_points={"console_scripts": ["cakd-train=cakd.train.trainer:main"]},
)
