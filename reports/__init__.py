"""Reports: tables (and later figures and regression checks) rendered purely from result
records."""
