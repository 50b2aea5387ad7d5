"""Maps the top-level folders export/, runtimes/ and devices/ into the edgevlm package.

The layout keeps torch-free code (runtimes, devices) physically apart from the
compression code while installing everything under one import name.
"""

from setuptools import find_packages, setup

FOLDERS = {
    "edgevlm": "edgevlm",
    "edgevlm.export": "export",
    "edgevlm.runtimes": "runtimes",
    "edgevlm.devices": "devices",
}

packages, package_dir = [], {}
for package, folder in FOLDERS.items():
    package_dir[package] = folder
    packages.append(package)
    packages += [f"{package}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"edgevlm.devices": ["profiles/*.toml"],
                  # random: presets read the real models' config/tokenizer files
                  "edgevlm.tiny": ["real/*.md", "real/*/*"],
                  # trained: reference models (fp16 weights, processor files, model card)
                  "edgevlm.trained": ["*/*"]},
)
