from setuptools import find_packages, setup

from imgworker import __version__

setup(
    name="imgworker",
    version=__version__,
    description="Self-hosted event-driven image renditions: upload API, RabbitMQ, systemd workers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["imgworker", "imgworker.*"]),
    python_requires=">=3.11",
    # Debian 12's versions are the floor: the .deb runs on exactly these.
    install_requires=[
        "pika>=1.2.0",
        "Pillow>=9.4.0",
        "gunicorn>=20.1.0",
        "prometheus_client>=0.16.0",
        "sdnotify>=0.3.1",
        "systemd-python>=234",
    ],
    entry_points={"console_scripts": ["imgworker = imgworker.cli:main"]},
)
