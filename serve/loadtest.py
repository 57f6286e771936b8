"""Load test: `python -m serve.loadtest IMAGE... --url http://127.0.0.1:5000 --clients 8 --requests 1000`."""
from ltrepro.serving.loadtest import main

if __name__ == "__main__":
    main()
