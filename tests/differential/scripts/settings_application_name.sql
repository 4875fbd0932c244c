-- application_name from the StartupMessage and from SET, reported with ParameterStatus.
-- client a startup application_name=from-startup
show application_name;
SET application_name = 'set-by-a';
-- client b startup application_name=b-app
show application_name;
-- client a
show application_name;
RESET application_name;
show application_name;
