from sashimi.cli import main

raise SystemExit(main())
