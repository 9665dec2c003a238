import sys, time; sys.path.insert(0, "/work/main")
import filechat
for i in range(2000):
    filechat.send("/tmp/prof/buf.txt", "hello")
