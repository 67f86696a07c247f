from moecl.cli import main

raise SystemExit(main())
