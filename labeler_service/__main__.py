from labeler_service.cli import main

if __name__ == "__main__":  # spawned processes (registration's hashing) import this module too
    main()
