"""The testbed's shared Python helpers, one copy each: checks and their tally (`checks`), bounded
waits (`waits`), the emulator's clients and instance credentials (`emulator`), a free port
(`net`), and the IMDSv2 stand-in (`imds`).

A script outside testbed/ puts testbed/ on sys.path first:
    sys.path.insert(0, os.path.join(ROOT, "testbed"))
"""
