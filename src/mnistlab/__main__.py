import sys

from mnistlab.processes import note_launcher

note_launcher()  # first: a rank notes its launcher before the slow imports (processes.end_with_parent)

from mnistlab.cli import main  # noqa: E402 - after the note above

sys.exit(main())
