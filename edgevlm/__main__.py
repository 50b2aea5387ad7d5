from edgevlm.cli import main

raise SystemExit(main())
