"""`python -m fastdl.info`: print versions, the build and each op's backend.
(The function is fastdl.info(); it lives in fastdl/_info.py so that running
this module does not import it twice.)"""
from fastdl._info import info

if __name__ == "__main__":
    info()
