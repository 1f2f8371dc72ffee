from sparsetrace.cli import main

raise SystemExit(main())
